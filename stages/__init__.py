"""One thin module per DVC stage: ``run(params, ctx, tracker) -> metrics`` plus ``python -m stages.<name>``."""
