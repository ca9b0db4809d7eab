"""refgen domain and adapters: settings, models, prompts, generation, storage, events, budget.

Nothing here imports Celery tasks; ``tasks/`` wires these pieces into the canvas.
"""
