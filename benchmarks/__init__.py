"""Recorded benchmarks: each writes a markdown file with the machine and the command."""
