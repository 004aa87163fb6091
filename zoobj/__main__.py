from zoobj.cli import main

main()
