from microvm_mcp.server import main

main()
