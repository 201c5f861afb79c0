"""The shapes world: a small text-to-image model the project trains itself, for demos and efficacy tests."""
