"""Data: offline generator (synthetic), Recipe1M reader, text/vocab rules, Ray Data preprocessing."""
