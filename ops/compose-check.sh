#!/usr/bin/env bash
# Build the real Dockerfile and bring the real docker-compose.yml up on a private Docker engine, then use it
# as a user would (tests/test_compose_stack.py, which this runs): a batch through the gateway with the openai
# SDK, `inferpool batch run` against the compose Redis, Flower's credentials, a worker killed mid-job and
# restarted, `down` and `up` with a job in Redis, no secret in `docker inspect` or the image's history.
#
# Needs root and Debian's docker.io, docker-compose and debootstrap (apt-get install docker.io docker-compose
# debootstrap). It starts its own dockerd (--iptables=false, its own directories under /tmp), builds the
# base images from Debian packages (no registry is needed), and removes everything when it ends. About
# 5-10 minutes; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_env.sh hf,dev
exec python -m pytest tests/test_compose_stack.py -m docker -v -s "$@"
