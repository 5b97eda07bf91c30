"""Thin routers, one per resource: validate (pydantic) -> call the serving object -> return its response."""
