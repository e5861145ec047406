"""The service's /v1 routes and its health and page routes, one router per concern (serving/app.py mounts
them); each route gets the shared state through the ``service`` dependency (serving/service.py)."""
