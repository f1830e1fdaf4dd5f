"""Operator tools around a MEDS run: the math reward, the recipes' data builder and the memory report."""
