"""What a recipe costs: the GPU table, the planner (`t2i-data plan`) and the run ledger (`t2i-data cost`)."""
