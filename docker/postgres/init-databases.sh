#!/usr/bin/env bash
# Create one role and one database each for MLflow and Prefect, each role owning only its own
# database. The postgres image runs this once, on an empty data volume
# (/docker-entrypoint-initdb.d); tests/test_stack.py runs the same script against a local server.
#
# Input (environment): POSTGRES_USER (a superuser), MLFLOW_DB, MLFLOW_DB_USER, MLFLOW_DB_PASSWORD,
# PREFECT_DB, PREFECT_DB_USER, PREFECT_DB_PASSWORD. libpq's PGHOST/PGPORT pick the server (the
# image's local socket when unset). Names and passwords go to psql as variables, quoted by psql
# (:"name" for identifiers, :'value' for literals), never pasted into SQL text.
set -euo pipefail

create_role_and_database() {
    # $1: database, $2: role, $3: password
    psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" --dbname postgres \
        -v db="$1" -v role="$2" -v password="$3" <<'SQL'
CREATE ROLE :"role" LOGIN PASSWORD :'password';
CREATE DATABASE :"db" OWNER :"role";
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
SQL
}

create_role_and_database "${MLFLOW_DB:?}" "${MLFLOW_DB_USER:?}" "${MLFLOW_DB_PASSWORD:?}"
create_role_and_database "${PREFECT_DB:?}" "${PREFECT_DB_USER:?}" "${PREFECT_DB_PASSWORD:?}"
