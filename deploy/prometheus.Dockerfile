# Prometheus from Debian's package, on the same base as deploy/Dockerfile (BASE_IMAGE: see there), so
# that it builds wherever the Potluck image does, without a container registry:
#
#   docker build -f deploy/prometheus.Dockerfile -t potluck-prometheus:bookworm deploy   # `make images`
#
# Its configuration is not in the image: docker-compose.yml mounts deploy/prometheus.yml and
# deploy/alerts.yml into /etc/prometheus (edit them, then POST /-/reload).
ARG BASE_IMAGE=potluck-base:bookworm
FROM ${BASE_IMAGE}
# NOTE: moment-timezone's unpacked zone files (212 MB, a dependency of the web UI) go: the UI loads the
# bundled moment-timezone-with-data.min.js
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* /usr/share/javascript/moment-timezone/data \
 && mkdir -p /prometheus \
 && chown prometheus:prometheus /prometheus
VOLUME ["/prometheus"]
USER prometheus
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
