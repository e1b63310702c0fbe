"""Flower ServerApp and ClientApp: thin translators between messages and the core rooms."""
