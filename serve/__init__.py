"""Ray Serve app for recipe search: deployments (encoders, index, API ingress, Gradio UI) and builders.

Importing the package does no work; ``serve.app`` holds the builders named in ``serve/config.yaml``.
"""
