"""The API's routes, one router a resource; ``create_app`` includes them in this order."""
