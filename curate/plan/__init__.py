"""`python -m curate plan`: the cost of a curation run before it is spent.

costs: the cost record (per-item costs the benches measure, each with its machine). Nothing is imported here: the
benches read `curate.plan.costs` without torch.
"""
