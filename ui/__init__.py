"""Gradio Blocks for the recipe search demo (``ui.app.build_demo``), mounted on Serve by
``serve.deployments``.
"""
