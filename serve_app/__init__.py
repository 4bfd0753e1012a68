"""The Ray Serve sampling application (see serve_app.app)."""
