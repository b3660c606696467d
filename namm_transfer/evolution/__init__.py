"""Evolving a NAMM: fitness on language prompts, CMA-ES trainer, supervised warm start."""
