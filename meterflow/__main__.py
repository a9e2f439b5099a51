from meterflow.cli import main

main()
