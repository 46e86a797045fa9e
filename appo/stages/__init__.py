"""One entry point per DVC stage: ``python -m appo.stages.<stage>`` reads params.yaml."""
