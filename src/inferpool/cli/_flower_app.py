"""The Celery app ``inferpool flower`` hands to Flower (``celery -A``): configured from the environment
as every inferpool process is, so Flower reaches the broker the same way (a ``sentinel://`` URL
included) with the same transport options."""

from inferpool.plumbing.celery_app import create_celery_app
from inferpool.plumbing.settings import Settings

app = create_celery_app(Settings())
