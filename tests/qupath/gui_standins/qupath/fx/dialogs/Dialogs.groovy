package qupath.fx.dialogs

/**
 * Test stand-in for qupath.fx.dialogs.Dialogs (QuPath 0.5+, qupath-fxtras; needs JavaFX): the two methods the
 * scripts call, with QuPath's signatures; each call is printed as one "DIALOG <kind>|<title>|<message>" line.
 */
class Dialogs {
    static void showErrorMessage(String title, String message) { println "DIALOG message|${title}|${message}" }

    static void showErrorNotification(String title, String message) { println "DIALOG notification|${title}|${message}" }
}
