from hdb.app.main import main

main()
