"""The bundled tiny model and task, built locally so that the demo and tests download nothing."""
