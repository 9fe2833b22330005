make demo   # the demo site on http://127.0.0.1:8000/, in seconds: SQLite, no broker, a stand-in tracker
make test   # the test suite, as CI runs it first
