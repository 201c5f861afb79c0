"""Vendored pure-torch networks the metrics score with (FID Inception, LPIPS-AlexNet, ResNet-50) and their weights."""
