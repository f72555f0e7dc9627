"""Renderings for people (Markdown, HTML, the console, Prefect's artifacts) of the typed results. Nothing below
imports a view, so changing one changes no stage's cache key."""
