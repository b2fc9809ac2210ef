"""Operations: the Prometheus exporter, Flower configuration, Prometheus and Grafana files."""
