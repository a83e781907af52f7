# @summary An absolute path on the node (commands run as argv arrays, so spaces are fine).
type Sakeystate::Absolutepath = Pattern[/\A\/[^\n\x00]*\z/]
