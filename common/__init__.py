"""Shared infrastructure that every stage builds on and that imports none of the project's packages."""
