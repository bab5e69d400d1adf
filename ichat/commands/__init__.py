"""The commands, the top layer: ``ichat serve``, ``ichat gateway``, ``ichat up``,
``ichat make-test-model``; each parses its flags and runs what the layers below build."""
