"""`fedqc bench`: the papers' experiment on a federation with known corruptions.

Arms (mixed, oracle, QC per scorer × rule, the ablation baselines), the contamination, anchor-count
and corruption-type sweeps, short federated training of chosen arms, tables and a report.
"""
