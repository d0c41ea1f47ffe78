from bottleneck.cli import main

main()
