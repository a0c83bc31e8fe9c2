"""Fixtures: tiny student checkpoints and their exports (tests/export/students.py)."""

from export.students import build_teacher, exported_dir, remote_code_cache, student_dir  # noqa: F401
