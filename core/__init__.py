"""SpanLens core: data -> spans -> model -> gradients -> index -> scores -> metrics -> store.

Nothing in this package imports Streamlit; the pages call :mod:`core.backend`.
"""
