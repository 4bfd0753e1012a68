"""The contract between stages: one typed handle per artifact, each owning its file names, reader and writer.

A stage takes the handles of what it reads and returns the handle of what it writes; no stage spells a
file name. :class:`~sdsg_ray.artifacts.layout.RunLayout` hands out every handle of one pipeline run from
its root. docs/architecture.md lists every handle and its files; tests/test_project.py checks that table
against the code.
"""
