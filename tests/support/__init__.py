"""What several test modules share: one way to wait (`waiting`), speaking tus from a test
(`tus` over aiohttp, `raw_http` over a plain socket, `sync_http` over urllib), servers in this
process (`servers`) and in subprocesses (`processes`), an upload's file (`files`), the fault
suites' common steps (`faults`, `faultfs`), Node-driven clients (`node`) and tools a test needs
(`tools`).

Test modules import helpers from here, never from one another nor from conftest.py, which
holds only fixtures.
"""
