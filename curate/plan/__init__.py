"""`python -m curate plan`: the cost of a curation run before it is spent.

model: each step's work, time, memory and array shape; costs: the cost record (per-item costs the benches measure,
each with its machine); gpu_speeds: stated GPU speeds; network_cost: the embedding network's FLOPs from its
architecture; text: the printed plan; cli: the command line. Nothing is imported here: the benches read
`curate.plan.costs` without torch.
"""
