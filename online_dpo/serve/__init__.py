"""Serving the policy with Ray Serve, on vLLM's own OpenAI layer.

  app.py      the deployment: routes, API key, version gate; deploy / undeploy
  replica.py  each replica's engine, and how it follows new policy versions
  api.py      the edge in front of vLLM's OpenAI layer: strict parsing, limits, errors

Nothing is imported here: `import online_dpo.serve.api` needs neither Ray nor vLLM.
"""
