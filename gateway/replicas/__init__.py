"""Gateway replicas on one Postgres and one Ray cluster: one leads the fleet, the others follow."""
