//! Building the model from Kafka and PostgreSQL.
