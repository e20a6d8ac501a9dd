"""The batch lifecycle, plain Python: validate and stage pulls, settle batches once their run has ended."""
