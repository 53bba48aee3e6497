"""What a user writes, checked before any work: a trial's keys (`trial`), a sweep file (`sweep`)
and its search-space grammar (`grammar`), and the names of the MLflow contract (`names`).
Pydantic and the standard library only: every layer reads these."""
