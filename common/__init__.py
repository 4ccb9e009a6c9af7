"""Shared infrastructure every stage builds on; imports no project package."""
