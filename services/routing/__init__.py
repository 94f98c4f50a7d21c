"""The routing service: picks a venue for each order, submits it, reports fills."""
