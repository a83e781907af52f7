module sakeystate.test/keyload

go 1.19
