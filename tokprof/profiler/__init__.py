"""Timing, energy, device specs and measured ceilings, roofline, and the RunResult schema."""

from __future__ import annotations
