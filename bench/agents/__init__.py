"""Agents the benchmark runs under real sidecars."""
