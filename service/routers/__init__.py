"""One router per resource: health/server, models/infer, repository, metrics."""
