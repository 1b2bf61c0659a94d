"""Local training on the device. ``base`` holds the backend-neutral interface; ORT lives behind it."""
