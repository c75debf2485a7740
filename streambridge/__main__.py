from streambridge.cli import main

main()
