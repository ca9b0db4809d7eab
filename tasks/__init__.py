"""Thin Celery tasks that wire ``worker`` into the canvas. Only this package imports Celery."""
